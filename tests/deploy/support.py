"""Helpers of tests/deploy: the shipped files, promtool, and the worker's metric names."""

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.integration.support import REPO
from worker.metrics import Metrics

DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "chat-worker.json"
METRIC_NAME = re.compile(r"\bchat_worker_[a-z_]+\b")


def load_yaml(path: Path) -> Any:
    """Return the one YAML document in a file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def prometheus_tool(name: str) -> str:
    """Return the path of promtool or prometheus; fail with the way to install them."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: run .ci/ensure-prometheus (make test does)")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool and return what it did."""
    return subprocess.run(
        [prometheus_tool("promtool"), *args], capture_output=True, text=True, timeout=60
    )


def alert_rules() -> list[dict[str, Any]]:
    """Return every alerting rule of the shipped rules file."""
    groups = load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def exported_metric_names() -> set[str]:
    """Return every sample name the worker exports, with each metric's suffixes."""
    families = list(Metrics(worker_id="names").registry.collect())
    names = {sample.name for family in families for sample in family.samples}
    # A gauge has no sample until set (oldest_event_age) or given labels (backlog).
    return names | {family.name for family in families if family.type == "gauge"}
