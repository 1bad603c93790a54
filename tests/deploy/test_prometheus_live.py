"""Debian's Prometheus scrapes a running engine, and every query of the dashboard and of the
alerts returns data.

The engine runs as in production, against a real RabbitMQ and PostgreSQL: `engine api` (the
cluster-wide metrics at /metrics), `engine worker` (its host's metrics on ENGINE_METRICS_PORT)
and `engine scheduler`, while jobs succeed, fail, retry, time out and are canceled, and a
schedule fires every second after missing its first fire times. Prometheus scrapes both every
second and evaluates deploy/prometheus/alerts.yml.

What "returns data" means for an alert, whose expression is empty while all is well: each
operand of its top-level `and` / `or` / `unless`, without its threshold comparison (``X > 0.25``
becomes ``X``; ``absent(X)`` becomes ``X``), must return at least one series with a number (not
NaN). So every metric name, label and label value an alert relies on is shown to exist as the
engine exports it. The whole expression must parse, and Prometheus must evaluate every rule
without error.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import engine
from tests.deploy.conftest import DEPLOY, alert_rules, dashboard_expressions, need_tool
from tests.integration.conftest import amqp_vhost, engine_env, pg_url, start_engine  # noqa: F401  (fixtures)
from tests.support.processes import run_process, start_process, wait_for, wait_for_state

pytestmark = pytest.mark.integration

#: How long Prometheus may take to have every series it needs: a rate needs two scrapes after a
#: counter moved, and the first fires and jobs take a few seconds.
DATA_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, timeout_s: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read()


def answers(url: str) -> bool:
    try:
        get(url, timeout_s=2)
        return True
    except OSError:
        return False


def alert_operands(expression: str) -> list[str]:
    """The parts of an alert's expression that say how things are, thresholds left out (see the
    module's docstring)."""
    parts, depth, start = [], 0, 0
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[(){}\[\]]|\b(?:and|or|unless)\b', expression):
        text = token.group()
        if text in "({[":
            depth += 1
        elif text in ")}]":
            depth -= 1
        elif text[0] != '"' and depth == 0:
            parts.append(expression[start : token.start()])
            start = token.end()
    parts.append(expression[start:])
    operands = []
    for part in (part.strip() for part in parts):
        absent = re.fullmatch(r"absent\((.*)\)", part, re.DOTALL)
        if absent:
            operands.append(absent.group(1).strip())
        else:
            threshold = re.fullmatch(r"(.*?)\s*(?:==|!=|>=|<=|>|<)\s*[-+]?[0-9.]+(?:e[-+]?[0-9]+)?", part, re.DOTALL)
            operands.append(threshold.group(1) if threshold else part)
    return operands


def test_alert_operands_leave_out_thresholds_and_absent():
    assert alert_operands('sum by (q) (rate(x{o=~"a|b"}[5m])) / sum(y) > 0.25\nand sum(z) >= 20') == [
        'sum by (q) (rate(x{o=~"a|b"}[5m])) / sum(y)', "sum(z)"
    ]
    assert alert_operands("max without (i) (w) == 0 or absent(w)") == ["max without (i) (w)", "w"]
    assert alert_operands('up{job=~"x|y"} == 0') == ['up{job=~"x|y"}']


class Prometheus:
    """Debian's `prometheus` on a free loopback port, with its own storage under `folder`."""

    def __init__(self, folder: Path, scrape_targets: dict[str, str]) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in scrape_targets.items()],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = folder / "prometheus.log"
        self.process = start_process(
            [
                need_tool("prometheus"), f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def api(self, path: str, **query: str) -> Any:
        reply = json.loads(get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(query)}"))
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector of `expression` now (a scalar as one sample)."""
        data = self.api("query", query=expression)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def has_numbers(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


@pytest.fixture
def mode() -> str:
    """engine_env's mode: RabbitMQ and PostgreSQL, as a deployment with Prometheus runs."""
    return "distributed"


@pytest.fixture
def running_engine(engine_env, start_engine) -> Iterator[dict[str, str]]:
    """`engine api` and `engine worker` on the test's RabbitMQ vhost and database (a test
    starts its schedulers); the addresses of the API and of the worker host's metrics."""
    ports = {"api": free_port(), "worker": free_port()}
    engine_env.update(
        ENGINE_API_PORT=str(ports["api"]), ENGINE_METRICS_PORT=str(ports["worker"]),
        ENGINE_WORKER_PROCESSES="2", ENGINE_WORKER_THREADS="4",
    )  # fmt: skip
    api, worker = start_engine("api"), start_engine("worker")
    wait_for(lambda: answers(f"http://127.0.0.1:{ports['api']}/readyz"), 60, "the API to be ready")
    wait_for(lambda: answers(f"http://127.0.0.1:{ports['worker']}/metrics"), 60, "the worker host's metrics")
    yield {"api": f"127.0.0.1:{ports['api']}", "worker": f"127.0.0.1:{ports['worker']}"}
    for process in (api, worker):
        assert process.process.poll() is None, f"{' '.join(process.args)} died:\n{process.output()[-3000:]}"


@pytest.fixture
def prometheus(running_engine, tmp_path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path, {"engine-api": running_engine["api"], "engine-worker": running_engine["worker"]})
    wait_for(lambda: answers(f"{server.url}/-/ready"), 60, f"Prometheus to be ready (log: {server.log_path})")
    yield server
    server.stop()


def submit_over_http(api: str, actor: str, *args: Any) -> str:
    request = urllib.request.Request(
        f"http://{api}/api/jobs", data=json.dumps({"actor": actor, "args": list(args)}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["id"]


def run_every_kind_of_job(api: str) -> None:
    """Jobs that succeed, fail, retry, time out and are canceled, and jobs that enqueue others
    from a worker (what a worker host's engine_jobs_enqueued_total counts); waits until each
    has ended."""
    succeeding = [submit_over_http(api, "echo", number) for number in range(5)]
    succeeding.append(engine.submit("fan_out", 5).id)
    retried = engine.submit("flaky", 1).id
    failing = engine.submit("hopeless").id  # failed at once, its message dead-lettered
    timing_out = engine.submit("busy_loop", 5).id  # its time limit is 300 ms
    long_running = engine.submit("cooperative", 100_000).id
    wait_for_state(long_running, {engine.JobState.RUNNING})
    engine.cancel(long_running)
    for job_id in (*succeeding, retried):
        wait_for_state(job_id, {engine.JobState.SUCCEEDED})
    for job_id in (failing, timing_out):
        wait_for_state(job_id, {engine.JobState.FAILED})
    wait_for_state(long_running, {engine.JobState.CANCELED})


def test_every_query_of_the_dashboard_and_the_alerts_returns_data(running_engine, prometheus, start_engine):
    # Its first fire times pass before any scheduler runs: the scheduler records them missed.
    engine.set_schedule("every-second", "echo", "* * * * * *", args=["tick"], misfire="skip", misfire_grace_s=1)
    time.sleep(3)
    scheduler = start_engine("scheduler")
    run_every_kind_of_job(running_engine["api"])

    queries = {f"panel {name}": expression for name, expression in dashboard_expressions()}
    for rule in alert_rules():
        for number, operand in enumerate(alert_operands(rule["expr"])):
            queries[f"alert {rule['alert']} operand {number}"] = operand
    missing: dict[str, str] = {}

    def all_have_data() -> bool:
        missing.clear()
        missing.update({name: expression for name, expression in queries.items() if not has_numbers(prometheus.query(expression))})
        return not missing

    deadline = time.monotonic() + DATA_TIMEOUT_S
    while not all_have_data() and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing, "no data for:\n" + "\n".join(f"  {name}: {expression}" for name, expression in missing.items())

    for rule in alert_rules():
        prometheus.query(rule["expr"])  # parses and evaluates (firing or not)
    evaluated = {rule["name"]: rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]}
    assert {name: rule["health"] for name, rule in evaluated.items()} == {rule["alert"]: "ok" for rule in alert_rules()}
    assert scheduler.process.poll() is None, scheduler.output()[-3000:]


def test_the_compose_health_checks_pass_against_a_running_engine(running_engine, start_engine):
    """Each engine service's health check of deploy/compose.yaml, run as Docker would, with this
    test's ports (and the scheduler's pid in place of the container's PID 1)."""
    scheduler = start_engine("scheduler")
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    replacements = {
        "api": ("127.0.0.1:8080", running_engine["api"]),
        "worker": ("127.0.0.1:9191", running_engine["worker"]),
        "scheduler-1": ("/proc/1/", f"/proc/{scheduler.pid}/"),
    }
    for name, (theirs, ours) in replacements.items():
        command, code = services[name]["healthcheck"]["test"][1:3], services[name]["healthcheck"]["test"][3]
        assert command == ["python", "-c"] and theirs in code, name
        done = run_process([sys.executable, "-c", code.replace(theirs, ours)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{name}: {done.stderr}"
    assert scheduler.process.poll() is None, scheduler.output()[-3000:]
