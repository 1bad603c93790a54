"""Prometheus's configuration, the alert rules and the dashboard's queries, checked by promtool."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, alert_rules, dashboard, dashboard_expressions, need_tool, read_yaml
from tests.support.processes import run_process

PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args: str, cwd=PROMETHEUS) -> subprocess.CompletedProcess:
    done = run_process([need_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_the_compose_configuration_is_valid():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml").stdout


def test_the_kubernetes_configuration_is_valid_but_for_its_service_discovery(tmp_path):
    """Debian's Prometheus is built without Kubernetes discovery: the rest is checked with a
    static target list in its place."""
    config = read_yaml(PROMETHEUS / "kubernetes.yml")
    for job in config["scrape_configs"]:
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
        job["static_configs"] = [{"targets": ["engine-api:8080"]}]
    config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
    (tmp_path / "kubernetes.yml").write_text(yaml.safe_dump(config))

    promtool("check", "config", "kubernetes.yml", cwd=tmp_path)


def test_the_alert_rules_are_valid_and_pass_their_unit_tests():
    promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml").stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not():
    tests = read_yaml(PROMETHEUS / "alerts.test.yml")["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown silent"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_says_what_happened_and_what_to_do(rule):
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"]
    runbook = rule["annotations"]["runbook"]
    assert runbook and "\n" not in runbook
    operations = " ".join((DEPLOY.parent / "docs" / "operations.md").read_text().split())  # lines wrapped anew
    assert f"`{rule['alert']}`" in operations and runbook in operations, "docs/operations.md must say the same"


def test_every_query_of_the_dashboard_parses(tmp_path):
    """promtool checks each query as a recording rule's expression, which needs no server."""
    rules = [{"record": f"dashboard:query_{number}", "expr": expression} for number, (_, expression) in enumerate(dashboard_expressions())]
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    promtool("check", "rules", "dashboard.yml", cwd=tmp_path)


def test_the_dashboard_uses_the_provisioned_datasource():
    provisioned = read_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    uids = {source["uid"] for source in provisioned}
    used = {json.dumps(panel["datasource"]) for panel in dashboard()["panels"] if panel["type"] != "row"}
    assert [json.loads(each)["uid"] for each in used] == list(uids)


def test_the_dashboard_is_provisioned_from_where_compose_mounts_it():
    provider = read_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "engine.yaml")["providers"][0]
    grafana = read_yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
