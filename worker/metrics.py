"""The worker's Prometheus metrics (SPEC §7), in a registry of their own.

`Metrics` only holds the instruments; the worker decides when to `.inc()`, `.set()` and
`.observe()` them. Each instance owns its `CollectorRegistry`, so tests and several workers in
one process never collide in the global registry.

Label values are bounded: `variant` takes the eight `ErrorVariant` values, `outcome` goes
through `api_outcome`, `reason` is one of `RETRY_REASONS`, `breaker` one of `BREAKERS`, and
`queue` the worker's own queue names.
"""

from collections.abc import Iterator
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker import __version__
from worker.pipeline.errors import ErrorVariant

PREFIX: Final = "chat_worker"

OUTCOME_OK: Final = "ok"
"""The `outcome` of an API call that Connect accepted."""
OUTCOME_OTHER: Final = "other"
"""The `outcome` of any error whose code is neither modelled nor a transport error."""

MODELLED_CODES: Final = frozenset(
    variant.value for variant in ErrorVariant if variant.value.endswith("Exception")
)
"""The five error codes the Connect API model declares."""

TRANSPORT_ERRORS: Final = frozenset(
    {
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "ConnectionError",
        "EndpointConnectionError",
        "HTTPClientError",
        "ProxyConnectionError",
        "ReadTimeoutError",
        "ResponseStreamingError",
        "SSLError",
    }
)
"""botocore's transport exceptions, by class name (what `translate_error` uses as code)."""

RETRY_REASONS: Final = ("throttled", "transient")
"""The `reason` label values of `retries`."""

BREAKERS: Final = ("outage", "account", "endpoint")
"""The `breaker` label values: the service-outage breaker, the account-wide-error one, and the
wrong-endpoint tripwire (open for good once tripped: 2xx answers that are not Connect's).

`breaker_state` takes the value of `worker.pipeline.breaker.BreakerState`: 0 closed, 1 open,
2 probing. A numeric gauge rather than an `Enum` metric: one series per breaker, `> 0`
alerts, and graphs that show the state directly.
"""

LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; from a fast local simulator (5 ms) up to a read timeout (30 s)."""


def api_outcome(error_code: str | None) -> str:
    """Return the `outcome` label of an API call: `ok`, a known error code, or `other`.

    `error_code` is None for a success, else `EventFailure.code`: Connect's error code, or the
    class name of a transport error. Anything else (an unmodelled code, a missing credential)
    becomes `other`, so a misbehaving endpoint cannot create unbounded series.
    """
    if error_code is None:
        return OUTCOME_OK
    if error_code in MODELLED_CODES or error_code in TRANSPORT_ERRORS:
        return error_code
    return OUTCOME_OTHER


class OptionalGauge(Collector):
    """A gauge that has no sample at all while its value is unknown.

    A replica that holds no event has no oldest event: a 0 would read as "the backlog is
    fresh" while the queue ages behind a paused replica.
    """

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self.value: float | None = None

    def set(self, value: float | None) -> None:
        """Set the value, or None to leave the metric without a sample."""
        self.value = value

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the family, with its sample only while the value is known."""
        family = GaugeMetricFamily(self._name, self._documentation)
        if self.value is not None:
            family.add_metric([], self.value)
        yield family


class Metrics:
    """Hold every instrument the worker reports, registered in a private registry."""

    def __init__(self, worker_id: str, version: str = __version__) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._define_flow_metrics()
        self._define_api_metrics()
        self._define_state_metrics()
        self.info = Info(PREFIX, "This replica's build and identity.", registry=self.registry)
        self.info.info({"version": version, "worker_id": worker_id})

    def _define_flow_metrics(self) -> None:
        """Define the counters of what happened to deliveries."""
        self.consumed = self._counter("consumed", "Deliveries taken from RabbitMQ.")
        self.delivered = self._counter("delivered", "Events Amazon Connect accepted.")
        self.new_chats = self._counter(
            "new_chats", "Delivered events that opened a new chat (NewChatCreated)."
        )
        self.dead_lettered = self._counter(
            "dead_lettered",
            "Events moved to a dead-letter queue (broker-confirmed), by error variant.",
            ["variant"],
        )
        for variant in ErrorVariant:
            self.dead_lettered.labels(variant=variant.value)
        self.duplicates_skipped = self._counter(
            "duplicates_skipped",
            "Redelivered events (same message_id, same body) already delivered, settled unsent.",
        )
        self.reused_message_ids = self._counter(
            "reused_message_ids",
            "Events whose message_id an earlier, different event carried; sent all the same.",
        )

    def _define_api_metrics(self) -> None:
        """Define the instruments of calls to SendChatIntegrationEvent."""
        self.api_calls = self._counter(
            "api_calls",
            "Calls to SendChatIntegrationEvent, by outcome: ok, error code, or other.",
            ["outcome"],
        )
        for outcome in (OUTCOME_OK, *sorted(MODELLED_CODES)):
            self.api_calls.labels(outcome=outcome)
        self.api_latency = Histogram(
            f"{PREFIX}_api_latency_seconds",
            "Duration of one SendChatIntegrationEvent call, whatever its outcome.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retries = self._counter(
            "retries", "API calls repeated after a failure, by reason.", ["reason"]
        )
        for reason in RETRY_REASONS:
            self.retries.labels(reason=reason)
        self.ambiguous_retries = self._counter(
            "ambiguous_retries",
            "Retries after a read timeout or closed connection: Connect may now hold a duplicate.",
        )
        self.send_rate = self._gauge(
            "send_rate",
            "The client-side rate limiter's current rate in requests/s, refreshed every 2 s.",
        )
        # NaN until the first refresh, not 0: 0 would read as "paused", and `send_rate < x`
        # alerts stay quiet on NaN.
        self.send_rate.set(float("nan"))

    def _define_state_metrics(self) -> None:
        """Define the gauges of what this replica holds and whether it works."""
        self.in_flight = self._gauge(
            "in_flight", "Deliveries this replica holds: taken, not yet acked, nacked or rejected."
        )
        self.breaker_state = self._gauge(
            "breaker_state", "Circuit breaker state: 0 closed, 1 open, 2 probing.", ["breaker"]
        )
        for breaker in BREAKERS:
            self.breaker_state.labels(breaker=breaker).set(0)  # closed
        self.backlog = self._gauge(
            "backlog", "Ready messages waiting in the worker's queue (last poll).", ["queue"]
        )
        # Now minus the AMQP `timestamp` (publish time) of the oldest event this replica holds
        # unsettled, or minus when it was received if it has none; refreshed every 2 s, since
        # a gauge does not age by itself. Absent (no sample) while the replica holds nothing: a
        # replica that handed everything back during an outage must not report 0 while its
        # queue ages (and a queue's own age cannot be read: single-active-consumer queues
        # refuse basic.get).
        self.oldest_event_age = OptionalGauge(
            f"{PREFIX}_oldest_event_age_seconds",
            "Age of the oldest event this replica holds unsettled, from its AMQP timestamp "
            "(else from when it was received); no sample while it holds none.",
        )
        self.registry.register(self.oldest_event_age)
        self.ready = self._gauge("ready", "1 while connected and consuming, else 0.")

    def _counter(self, name: str, documentation: str, labels: list[str] | None = None) -> Counter:
        """Register a counter named `chat_worker_<name>` (exposed with a `_total` suffix)."""
        return Counter(f"{PREFIX}_{name}", documentation, labels or (), registry=self.registry)

    def _gauge(self, name: str, documentation: str, labels: list[str] | None = None) -> Gauge:
        """Register a gauge named `chat_worker_<name>`."""
        return Gauge(f"{PREFIX}_{name}", documentation, labels or (), registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """Return the exposition text of every metric and its HTTP content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
