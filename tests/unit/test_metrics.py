"""The metric names, labels and defaults an operator's dashboards and alerts rely on."""

import math

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from worker.metrics import Metrics, api_outcome
from worker.pipeline.errors import ErrorVariant


def samples(metrics: Metrics) -> list[Sample]:
    """Render `metrics` and return every sample of the exposition."""
    body, _ = metrics.render()
    return [
        sample
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    ]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """Return the one sample named `name` whose labels include `labels`."""
    found = [s for s in samples(metrics) if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0].value


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(worker_id="host-1", version="9.9.9")


def test_render_returns_text_with_the_prometheus_content_type(metrics: Metrics) -> None:
    body, content_type = metrics.render()

    assert content_type == CONTENT_TYPE_LATEST
    assert b"# TYPE chat_worker_consumed_total counter" in body


def test_every_dead_letter_variant_shows_at_zero_before_traffic(metrics: Metrics) -> None:
    for variant in ErrorVariant:
        assert value(metrics, "chat_worker_dead_lettered_total", variant=variant.value) == 0.0
    assert len(ErrorVariant) == 8


def test_counters_count_under_their_names(metrics: Metrics) -> None:
    # Given a few events of each kind
    metrics.consumed.inc(3)
    metrics.delivered.inc(2)
    metrics.dead_lettered.labels(variant=ErrorVariant.MALFORMED).inc()
    metrics.api_calls.labels(outcome=api_outcome("ThrottlingException")).inc()
    metrics.retries.labels(reason="throttled").inc()
    metrics.ambiguous_retries.inc()
    metrics.duplicates_skipped.inc()

    # Then the exposition shows them with the `_total` suffix and their labels
    assert value(metrics, "chat_worker_consumed_total") == 3.0
    assert value(metrics, "chat_worker_delivered_total") == 2.0
    assert value(metrics, "chat_worker_dead_lettered_total", variant="MalformedEvent") == 1.0
    assert value(metrics, "chat_worker_api_calls_total", outcome="ThrottlingException") == 1.0
    assert value(metrics, "chat_worker_retries_total", reason="throttled") == 1.0
    assert value(metrics, "chat_worker_retries_total", reason="transient") == 0.0
    assert value(metrics, "chat_worker_ambiguous_retries_total") == 1.0
    assert value(metrics, "chat_worker_duplicates_skipped_total") == 1.0


def test_api_latency_is_a_histogram_in_seconds(metrics: Metrics) -> None:
    metrics.api_latency.observe(0.004)
    metrics.api_latency.observe(12.0)

    assert value(metrics, "chat_worker_api_latency_seconds_count") == 2.0
    assert value(metrics, "chat_worker_api_latency_seconds_bucket", le="0.005") == 1.0
    assert value(metrics, "chat_worker_api_latency_seconds_bucket", le="30.0") == 2.0


def test_gauges_show_what_was_set(metrics: Metrics) -> None:
    metrics.send_rate.set(4.5)
    metrics.in_flight.set(7)
    metrics.breaker_state.labels(breaker="outage").set(1)  # open
    metrics.backlog.labels(queue="chat-integration-events.work").set(120)
    metrics.oldest_event_age.set(42.0)
    metrics.ready.set(1)

    assert value(metrics, "chat_worker_send_rate") == 4.5
    assert value(metrics, "chat_worker_in_flight") == 7.0
    assert value(metrics, "chat_worker_breaker_state", breaker="outage") == 1.0
    assert value(metrics, "chat_worker_breaker_state", breaker="account") == 0.0
    assert value(metrics, "chat_worker_backlog", queue="chat-integration-events.work") == 120.0
    assert value(metrics, "chat_worker_oldest_event_age_seconds") == 42.0
    assert value(metrics, "chat_worker_ready") == 1.0


def test_defaults_before_the_worker_reports_anything(metrics: Metrics) -> None:
    assert math.isnan(value(metrics, "chat_worker_send_rate"))  # not refreshed yet
    assert value(metrics, "chat_worker_ready") == 0.0
    assert value(metrics, "chat_worker_breaker_state", breaker="outage") == 0.0
    assert value(metrics, "chat_worker_api_calls_total", outcome="ok") == 0.0


def test_info_carries_version_and_worker_id(metrics: Metrics) -> None:
    assert value(metrics, "chat_worker_info", version="9.9.9", worker_id="host-1") == 1.0


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(worker_id="a"), Metrics(worker_id="b")

    first.consumed.inc()

    assert value(first, "chat_worker_consumed_total") == 1.0
    assert value(second, "chat_worker_consumed_total") == 0.0


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (None, "ok"),
        ("ThrottlingException", "ThrottlingException"),
        ("InternalServiceException", "InternalServiceException"),
        ("AccessDeniedException", "AccessDeniedException"),
        ("InvalidRequestException", "InvalidRequestException"),
        ("ResourceNotFoundException", "ResourceNotFoundException"),
        ("ReadTimeoutError", "ReadTimeoutError"),
        ("EndpointConnectionError", "EndpointConnectionError"),
        ("ConnectionClosedError", "ConnectionClosedError"),
        ("ServiceQuotaExceededException", "other"),
        ("NoCredentialsError", "other"),
        ("", "other"),
    ],
)
def test_api_outcome_keeps_known_codes_and_folds_the_rest(code: str | None, outcome: str) -> None:
    assert api_outcome(code) == outcome


def test_api_outcome_cardinality_is_bounded(metrics: Metrics) -> None:
    # Given an endpoint that answers with a different made-up code every time
    for n in range(100):
        metrics.api_calls.labels(outcome=api_outcome(f"WeirdException{n}")).inc()

    # Then they all land in one series
    outcomes = {
        s.labels["outcome"] for s in samples(metrics) if s.name.startswith("chat_worker_api_calls")
    }
    assert "other" in outcomes
    assert len(outcomes) <= 7
    assert value(metrics, "chat_worker_api_calls_total", outcome="other") == 100.0


def test_the_oldest_event_age_has_no_sample_while_nothing_is_held(metrics: Metrics) -> None:
    # A replica that holds nothing has no oldest event: a 0 would read as a fresh backlog
    assert metrics.registry.get_sample_value("chat_worker_oldest_event_age_seconds") is None
    assert b"# TYPE chat_worker_oldest_event_age_seconds gauge" in metrics.render()[0]
    metrics.oldest_event_age.set(12.5)
    assert value(metrics, "chat_worker_oldest_event_age_seconds") == 12.5
    metrics.oldest_event_age.set(None)
    assert metrics.registry.get_sample_value("chat_worker_oldest_event_age_seconds") is None
