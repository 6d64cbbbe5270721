"""Build the per-message pipeline from the settings, reporting into metrics and logs.

Nothing here decides anything about a message: it only connects the pieces that do (see
`worker.pipeline`), so that the lifecycle can hold one handler and one guard.
"""

from collections.abc import Callable
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from worker.broker import explained
from worker.metrics import Metrics, api_outcome
from worker.pipeline.account import AccountEvidence, EvidenceRules
from worker.pipeline.breaker import Breaker, BreakerState, Tripwire
from worker.pipeline.connect_client import ConnectClient
from worker.pipeline.dedupe import DeliveredLedger, MemoryLedger, RedisLedger
from worker.pipeline.guard import CallGuard, CallObserver
from worker.pipeline.handler import MessageHandler
from worker.pipeline.inflight import InFlight
from worker.pipeline.policy import RetryPolicy
from worker.pipeline.rate_limiter import AdaptiveRateLimiter, RateLimitConfig
from worker.pipeline.settlement import Settler
from worker.settings import WorkerSettings
from worker.topology import Topology, declare_topology


def make_ledger(settings: WorkerSettings) -> DeliveredLedger | None:
    """Return the delivered-events ledger the settings ask for (None: dedupe off)."""
    if settings.dedupe_window_seconds <= 0:
        return None
    if settings.redis_url is not None:
        url = settings.redis_url.get_secret_value()
        return RedisLedger(url, settings.queue, settings.dedupe_window_seconds)
    return MemoryLedger(settings.dedupe_window_seconds)


def make_guard(
    settings: WorkerSettings,
    metrics: Metrics,
    inflight: InFlight,
    log: Any,
    on_accepted: Callable[[], None] = lambda: None,
) -> CallGuard:
    """Build the rate limiter and breakers, reporting into metrics and logs.

    `on_accepted` hears every call Connect accepted: the lifecycle learns that Connect is up.
    """
    s = settings
    limiter = AdaptiveRateLimiter(
        RateLimitConfig(initial_rate=s.rate_initial, min_rate=s.rate_min, max_rate=s.rate_max)
    )

    def on_change(breaker: Breaker) -> None:
        """Export and log a breaker's new state; an account-wide refusal is logged loudly."""
        metrics.breaker_state.labels(breaker=breaker.name).set(breaker.state)
        level = "error" if breaker.name == "account" and not breaker.closed else "warning"
        getattr(log, level)(
            "breaker.state_changed", breaker=breaker.name, state=breaker.state.name.lower()
        )

    def breaker(name: str, threshold: int) -> Breaker:
        return Breaker(name, threshold, s.probe_seconds, s.probe_max_seconds, on_change)

    def on_trip(tripwire: Tripwire) -> None:
        """Export and log, loudly, that calls stopped for good, and why."""
        metrics.breaker_state.labels(breaker=tripwire.name).set(BreakerState.OPEN)
        log.error("breaker.tripped", breaker=tripwire.name, reason=tripwire.reason)

    def on_answer(outcome: str, seconds: float) -> None:
        code = None if outcome == "ok" else outcome
        if code is None:
            on_accepted()
        metrics.api_calls.labels(outcome=api_outcome(code)).inc()
        metrics.api_latency.observe(seconds)

    return CallGuard(
        limiter,
        breaker("outage", s.outage_threshold),
        # The evidence decides when the account is refused: its breaker opens at its word.
        breaker("account", 1),
        AccountEvidence(
            EvidenceRules(
                streak=s.account_threshold,
                memory_seconds=s.account_memory_seconds,
                undecided_seconds=s.account_undecided_seconds,
            )
        ),
        CallObserver(on_answer, metrics.ambiguous_retries.inc),
        stages=inflight,
        endpoint=Tripwire("endpoint", s.endpoint_odd_answers, on_trip),
    )


async def declare_for_dead_letters(
    settings: WorkerSettings, connection: AbstractRobustConnection
) -> tuple[AbstractChannel, Topology]:
    """Declare the topology on a channel of its own, for dead letters; return both.

    Dead letters get their own channel: a failed publish must not close the consumer's.
    """
    with explained(settings):
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = await declare_topology(channel, settings.queue, settings.partitions)
    return channel, topology


def make_handler(
    settings: WorkerSettings,
    *,
    client: ConnectClient,
    guard: CallGuard,
    dead_letter_exchange: AbstractExchange,
    inflight: InFlight,
    metrics: Metrics,
    ledger: DeliveredLedger | None,
    log: Any,
) -> MessageHandler:
    """Wire one message's pipeline: decode, turn, guard, call, settle."""
    delay = settings.dead_letter_retry_delay_seconds
    return MessageHandler(
        client,
        RetryPolicy.from_settings(settings),
        guard,
        Settler(dead_letter_exchange, delay, inflight, log),
        metrics,
        ledger,
        inflight=inflight,
        worker_id=settings.worker_id,
        max_body_bytes=settings.max_body_bytes,
        log=log,
    )
