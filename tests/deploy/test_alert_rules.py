"""The shipped alert rules: promtool's checks and unit tests, and what each alert rests on."""

from tests.deploy.support import (
    ALERT_TESTS,
    ALERTS,
    METRIC_NAME,
    alert_rules,
    exported_metric_names,
    load_yaml,
    promtool,
)
from tests.integration.support import REPO


def test_the_rules_file_passes_promtool_check() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_passes_its_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    # Given the alerts and the unit tests' expectations
    cases = [case for test in load_yaml(ALERT_TESTS)["tests"] for case in test["alert_rule_test"]]
    # Then each alert is expected to fire somewhere and to stay quiet somewhere
    for rule in alert_rules():
        expectations = [bool(c["exp_alerts"]) for c in cases if c["alertname"] == rule["alert"]]
        assert True in expectations, f"{rule['alert']} is never expected to fire"
        assert False in expectations, f"{rule['alert']} is never expected to stay quiet"


def test_the_rules_use_only_metrics_the_worker_exports() -> None:
    used = set(METRIC_NAME.findall(ALERTS.read_text(encoding="utf-8")))
    assert used, "no chat_worker_ metric in the rules"
    assert used <= exported_metric_names(), used - exported_metric_names()


def test_every_alert_has_a_runbook_line_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    runbook = readme.split("### Alerts and what to do", 1)[1].split("\n## ", 1)[0]
    for rule in alert_rules():
        assert f"| `{rule['alert']}` |" in runbook, f"no runbook line for {rule['alert']}"
        assert rule["annotations"]["runbook"].startswith("README.md#alerts-and-what-to-do")
