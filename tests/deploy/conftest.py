"""What the deploy tests share: where the deploy files are, and the tools that check them.

promtool and prometheus (Debian's `prometheus`), docker-compose and systemd-analyze are found on
PATH. On a laptop without one, its tests are skipped; under CI (CI=true) they fail instead:
.ci/run installs them, and CI must never skip them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"

#: What the deploy files give a worker beyond ENGINE_SHUTDOWN_TIMEOUT_S to stop: the time to
#: requeue and record the jobs that did not finish.
STOP_MARGIN_S = 60.0
REQUIRE_TOOLS = os.environ.get("CI") == "true"


def need_tool(name: str) -> str:
    """The path of command `name`; skip (fail under CI) without it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if REQUIRE_TOOLS:
            pytest.fail(f"{message} (.ci/run installs it; CI must not skip these tests)", pytrace=False)
        pytest.skip(message)
    return path


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def read_yaml_documents(path: Path) -> list[Any]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of deploy/prometheus/alerts.yml."""
    groups = read_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "engine.json").read_text())


def dashboard_panels() -> Iterator[dict[str, Any]]:
    """The dashboard's panels, those inside rows too."""
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


#: What Grafana puts in place of the dashboard's variables, to run its queries elsewhere.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$queue": ".*"}


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, its variables filled in."""
    found = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expression = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expression = expression.replace(variable, value)
            assert "$" not in expression, f"unknown variable in {expression!r}"
            found.append((f"{panel['title']} {target['refId']}", expression))
    return found


def engine_variables(text: str) -> set[str]:
    return set(re.findall(r"\bENGINE_[A-Z0-9_]+\b", text))
