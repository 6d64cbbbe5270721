"""The Grafana dashboard: valid PromQL on the worker's own metrics, one data source variable."""

import json
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import DASHBOARD, METRIC_NAME, exported_metric_names, promtool

# What Grafana puts in place of its variables before it sends a query.
VARIABLES = {"$namespace": ".*", "$job": ".*", "$__rate_interval": "1m"}


def dashboard() -> dict[str, Any]:
    """Return the dashboard's JSON model."""
    model: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return model


def queries() -> list[str]:
    """Return every panel query, with Grafana's variables replaced as Grafana does."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append(expr)
    return found


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    # Given each query as a recording rule, which promtool parses offline
    recorded = [{"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries())]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    # Then promtool finds every one of them valid
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries())} rules found" in result.stdout


def test_the_panels_use_only_metrics_the_worker_exports() -> None:
    used = {name for query in queries() for name in METRIC_NAME.findall(query)}
    assert used <= exported_metric_names(), used - exported_metric_names()


def test_the_panels_cover_every_metric_an_alert_rests_on() -> None:
    alerts = (DASHBOARD.parents[1] / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    on_dashboard = {name for query in queries() for name in METRIC_NAME.findall(query)}
    assert set(METRIC_NAME.findall(alerts)) <= on_dashboard


def test_every_panel_queries_the_chosen_data_source_and_ids_are_unique() -> None:
    model = dashboard()
    [source] = [v for v in model["templating"]["list"] if v["type"] == "datasource"]
    reference = {"type": "prometheus", "uid": f"${{{source['name']}}}"}
    ids = [panel["id"] for panel in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        assert panel["datasource"] == reference, panel["title"]
        assert all(target["datasource"] == reference for target in panel["targets"])
