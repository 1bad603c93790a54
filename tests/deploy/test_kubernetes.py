"""The Kubernetes manifests are valid resources and fit together: settings, secrets, probes, ports."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.conftest import DEPLOY, STOP_MARGIN_S, read_yaml, read_yaml_documents

MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
#: The oldest Kubernetes release the manifests are checked against, and the newest known.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


def resources() -> list[dict[str, Any]]:
    return [document for path in MANIFESTS for document in read_yaml_documents(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    return next(each for each in resources() if each["kind"] == kind and each["metadata"]["name"] == name)


def pod(component: str) -> dict[str, Any]:
    return find("Deployment", f"engine-{component}")["spec"]["template"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("resource", resources(), ids=lambda each: f"{each['kind']}/{each['metadata']['name']}")
def test_a_manifest_is_a_valid_resource(resource, version):
    kubernetes_validate.validate(resource, version, strict=True)  # raises, naming the field


def test_the_api_workers_and_two_schedulers_are_deployed():
    deployments = {each["metadata"]["name"]: each for each in resources() if each["kind"] == "Deployment"}
    assert set(deployments) == {"engine-api", "engine-worker", "engine-scheduler"}
    assert deployments["engine-scheduler"]["spec"]["replicas"] == 2
    for component in ("api", "worker", "scheduler"):
        assert pod(component)["spec"]["containers"][0]["args"] == [component]


def test_worker_pods_get_the_shutdown_timeout_to_stop_and_a_margin_to_requeue():
    settings = find("ConfigMap", "engine-settings")["data"]
    grace_s = pod("worker")["spec"]["terminationGracePeriodSeconds"]
    assert grace_s == float(settings["ENGINE_SHUTDOWN_TIMEOUT_S"]) + STOP_MARGIN_S


def test_settings_come_from_the_config_map_and_credentials_from_the_secret():
    settings = find("ConfigMap", "engine-settings")["data"]
    credentials = find("Secret", "engine-credentials")["stringData"]
    assert set(credentials) == {"ENGINE_BROKER_URL", "ENGINE_STORE_URL", "ENGINE_API_TOKEN"}
    assert not set(settings) & set(credentials)
    for component in ("api", "worker", "scheduler"):
        container = pod(component)["spec"]["containers"][0]
        assert container["envFrom"] == [{"configMapRef": {"name": "engine-settings"}}, {"secretRef": {"name": "engine-credentials"}}]


def test_the_api_is_probed_served_and_scraped_on_its_port():
    settings = find("ConfigMap", "engine-settings")["data"]
    api = pod("api")
    container = api["spec"]["containers"][0]
    assert container["ports"] == [{"name": "http", "containerPort": int(settings["ENGINE_API_PORT"])}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert find("Service", "engine-api")["spec"]["ports"][0]["targetPort"] == "http"
    assert api["metadata"]["annotations"]["prometheus.io/port"] == settings["ENGINE_API_PORT"]


def test_workers_are_probed_and_scraped_on_their_metrics_port():
    settings = find("ConfigMap", "engine-settings")["data"]
    worker = pod("worker")
    container = worker["spec"]["containers"][0]
    assert container["ports"] == [{"name": "metrics", "containerPort": int(settings["ENGINE_METRICS_PORT"])}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert settings["ENGINE_METRICS_HOST"] == "0.0.0.0"
    assert worker["metadata"]["annotations"]["prometheus.io/port"] == settings["ENGINE_METRICS_PORT"]
    assert find("Service", "engine-worker-metrics")["spec"]["clusterIP"] == "None"


def test_every_pod_selected_by_its_deployment_and_labelled_for_prometheus():
    for component in ("api", "worker", "scheduler"):
        deployment = find("Deployment", f"engine-{component}")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == labels
        assert labels["app.kubernetes.io/component"] == component  # what deploy/prometheus/kubernetes.yml keeps


def test_schedulers_are_probed_as_compose_checks_them():
    """The check that tests/deploy/test_prometheus_live.py runs against a live scheduler."""
    compose = read_yaml(DEPLOY / "compose.yaml")["services"]["scheduler-1"]["healthcheck"]["test"]
    probe = pod("scheduler")["spec"]["containers"][0]["livenessProbe"]["exec"]["command"]
    assert probe == compose[1:]
