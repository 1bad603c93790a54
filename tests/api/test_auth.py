"""The bearer token: every /api route needs it when ENGINE_API_TOKEN is set; health, the
description and the page stay open; and a server bound beyond loopback without one warns."""

from __future__ import annotations

import pytest
from loguru import logger

OPEN = ["/healthz", "/readyz", "/openapi.json", "/"]
GUARDED = ["/api/jobs", "/api/actors", "/api/queues", "/api/workers", "/api/overview"]


@pytest.mark.parametrize("mode", ["embedded"], indirect=True)
def test_with_a_token_the_api_needs_it_and_health_stays_open(serve):
    client = serve(api_token="s3cret-token")
    for path in GUARDED:
        assert client.get(path).status == 401
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status == 401
        assert client.get(path, headers={"Authorization": "Basic s3cret-token"}).status == 401
        assert client.get(path, headers={"Authorization": "Bearer s3cret-token"}).status == 200
    assert client.get("/api/jobs").headers["WWW-Authenticate"].startswith("Bearer")
    assert client.post("/api/jobs", {"actor": "echo", "args": [1]}).status == 401
    submitted = client.post("/api/jobs", {"actor": "echo", "args": [1]}, headers={"Authorization": "Bearer s3cret-token"})
    assert submitted.status == 202
    for path in OPEN:
        assert client.get(path).status == 200, path
    # the description says which operations need it
    description = client.get("/openapi.json").json
    assert description["paths"]["/api/jobs"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in description["paths"]["/healthz"]["get"]


@pytest.mark.parametrize("mode", ["embedded"], indirect=True)
def test_without_a_token_everything_is_open(client):
    for path in GUARDED + OPEN:
        assert client.get(path).status == 200, path


@pytest.mark.parametrize("mode", ["embedded"], indirect=True)
def test_binding_beyond_loopback_without_a_token_warns(serve):
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        serve(api_host="0.0.0.0")
        serve(api_host="0.0.0.0", api_token="t")
        serve(api_host="127.0.0.1")
    finally:
        logger.remove(sink)
    assert len([line for line in warnings if "without ENGINE_API_TOKEN" in line]) == 1


def test_the_default_address_is_loopback():
    from engine.settings import Settings

    assert Settings().api_host == "127.0.0.1"
