"""deploy/compose.yaml is valid as docker-compose reads it, and runs every part of the engine."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, STOP_MARGIN_S, need_tool
from tests.support.processes import run_process

COMPOSE = DEPLOY / "compose.yaml"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    """The services as docker-compose resolves them (anchors merged), with no Docker daemon."""
    done = run_process([need_tool("docker-compose"), "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


def test_docker_compose_finds_the_file_valid():
    done = run_process([need_tool("docker-compose"), "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_service_has_a_health_check(services):
    assert set(services) == {"rabbitmq", "postgres", "api", "worker", "scheduler-1", "scheduler-2", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name


def test_engine_services_run_the_engine_commands(services):
    commands = {name: service["command"] for name, service in services.items() if service.get("image") == "engine:latest"}
    assert commands == {"api": ["api"], "worker": ["worker"], "scheduler-1": ["scheduler"], "scheduler-2": ["scheduler"]}


def test_workers_scale_and_serve_their_metrics_to_prometheus(services):
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # both would stop --scale worker=N
    port = worker["environment"]["ENGINE_METRICS_PORT"]
    assert worker["environment"]["ENGINE_METRICS_HOST"] == "0.0.0.0"
    assert f"127.0.0.1:{port}/healthz" in " ".join(worker["healthcheck"]["test"])
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    workers = next(job for job in scrape if job["job_name"] == "engine-worker")
    assert workers["dns_sd_configs"] == [{"names": ["worker"], "type": "A", "port": int(port), "refresh_interval": "15s"}]


def test_workers_get_longer_than_the_shutdown_timeout_to_stop(services):
    worker = services["worker"]
    shutdown_timeout_s = float(worker["environment"]["ENGINE_SHUTDOWN_TIMEOUT_S"])
    assert worker["stop_signal"] == "SIGTERM"
    assert int(worker["stop_grace_period"].removesuffix("s")) == shutdown_timeout_s + STOP_MARGIN_S


def test_the_api_is_checked_and_scraped_where_it_listens(services):
    api = services["api"]
    port = api["environment"]["ENGINE_API_PORT"]
    assert api["environment"]["ENGINE_API_HOST"] == "0.0.0.0"
    assert f"127.0.0.1:{port}/healthz" in " ".join(api["healthcheck"]["test"])
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert next(job for job in scrape if job["job_name"] == "engine-api")["static_configs"] == [{"targets": [f"api:{port}"]}]
