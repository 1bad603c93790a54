"""Each error status of the API, as `{"error": {"code", "message", ...}}`, never a traceback."""

from __future__ import annotations

import psycopg
import pytest

from engine.job import JobState
from tests.integration.conftest import PG_ADMIN_URL
from tests.support.processes import point_engine_at, wait_for_state


def _error(answer, status: int, code: str) -> dict:
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.json["error"]
    assert error["code"] == code and error["message"] and error["request_id"] == answer.headers["X-Request-Id"]
    assert b"Traceback" not in answer.body
    return error


def test_400_malformed_json(client):
    _error(client.post("/api/jobs", body=b'{"actor": ', headers={"Content-Type": "application/json"}), 400, "malformed_json")


def test_404_unknown_job_and_route(client):
    assert "nope" in _error(client.get("/api/jobs/nope"), 404, "job_not_found")["message"]
    _error(client.get("/api/jobs/nope/result"), 404, "job_not_found")
    _error(client.get("/api/jobs/nope/attempts"), 404, "job_not_found")
    _error(client.post("/api/jobs/nope/cancel"), 404, "job_not_found")
    _error(client.post("/api/jobs/nope/retry"), 404, "job_not_found")
    _error(client.get("/api/nothing-here"), 404, "not_found")


def test_405_names_the_allowed_methods(client):
    answer = client.request("DELETE", "/api/jobs")
    _error(answer, 405, "method_not_allowed")
    assert answer.headers["Allow"] == "GET, HEAD, POST"
    assert client.request("PUT", "/healthz").headers["Allow"] == "GET, HEAD"


def test_409_result_not_ready_and_retry_of_a_waiting_job(client):
    job = client.post("/api/jobs", {"actor": "echo", "args": [1]}).json
    assert "queued" in _error(client.get(f"/api/jobs/{job['id']}/result"), 409, "result_not_ready")["message"]
    _error(client.post(f"/api/jobs/{job['id']}/retry"), 409, "invalid_state")


def test_409_retry_of_a_running_job(client, worker):
    job = client.post("/api/jobs", {"actor": "sleepy", "args": [2]}).json
    wait_for_state(job["id"], {JobState.RUNNING})
    assert "running" in _error(client.post(f"/api/jobs/{job['id']}/retry"), 409, "invalid_state")["message"]


def test_413_a_body_too_large_is_refused_unread(serve):
    client = serve(api_max_body_bytes=1000)
    answer = client.post("/api/jobs", {"actor": "echo", "args": ["x" * 2000]})
    _error(answer, 413, "body_too_large")
    assert answer.headers["Connection"] == "close"
    assert client.get("/api/jobs").json["jobs"] == []


def test_415_a_body_that_is_not_json(client):
    _error(client.post("/api/jobs", body=b"actor=echo", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type")


def test_422_names_each_invalid_field(client):
    error = _error(client.post("/api/jobs", {"actor": "", "args": {}, "priority": 11, "colour": "red"}), 422, "invalid_fields")
    assert {field["field"] for field in error["fields"]} == {"actor", "args", "priority", "colour"}
    error = _error(client.get("/api/jobs?limit=0&status=lost&state=failed"), 422, "invalid_fields")
    assert {field["field"] for field in error["fields"]} == {"limit", "status", "state"}
    error = _error(client.get("/api/jobs?cursor=not-a-cursor"), 422, "invalid_fields")
    assert error["fields"][0]["field"] == "cursor"


def test_422_unknown_actor(client):
    error = _error(client.post("/api/jobs", {"actor": "no_such_actor"}), 422, "unknown_actor")
    assert error["fields"][0]["field"] == "actor" and "echo" in error["message"]


def test_422_arguments_that_do_not_fit_the_actor_and_nothing_is_enqueued(client):
    # sleepy(seconds: float)
    error = _error(client.post("/api/jobs", {"actor": "sleepy", "args": ["notanumber"]}), 422, "invalid_arguments")
    assert [field["field"] for field in error["fields"]] == ["args.0"] and "seconds" in error["fields"][0]["message"]
    error = _error(client.post("/api/jobs", {"actor": "sleepy", "kwargs": {"secs": 1}}), 422, "invalid_arguments")
    assert {field["field"] for field in error["fields"]} == {"kwargs.secs", "seconds"}
    error = _error(client.post("/api/jobs", {"actor": "sleepy", "args": [1, 2]}), 422, "invalid_arguments")
    assert [field["field"] for field in error["fields"]] == ["args.1"]
    assert client.get("/api/jobs").json["jobs"] == []


def test_401_is_answered_before_anything_else_under_api(serve):
    client = serve(api_token="s3cret")
    _error(client.get("/api/jobs/nope"), 401, "unauthorized")
    _error(client.request("DELETE", "/api/jobs"), 401, "unauthorized")


def test_400_a_request_line_the_server_cannot_read(client):
    import socket

    with socket.create_connection((client.host, client.port), timeout=10) as connection:
        connection.sendall(b"GET /healthz HTTP/9\r\n\r\n")
        answer = b"".join(iter(lambda: connection.recv(65536), b""))  # headers and body may come apart
    assert answer.startswith(b"HTTP/1.1 505") or answer.startswith(b"HTTP/1.1 400"), answer
    assert b'"error"' in answer and b"Traceback" not in answer


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_503_while_the_store_cannot_be_reached(client, engine_env):
    job = client.post("/api/jobs", {"actor": "echo", "args": [1]}).json
    # given a store whose database takes no connection any more, its open ones cut
    name = engine_env["ENGINE_STORE_URL"].rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
        try:
            # then reads answer 503 with Retry-After, and readiness says why
            for answer in (client.get(f"/api/jobs/{job['id']}"), client.get("/api/jobs"), client.get("/readyz")):
                _error(answer, 503, "store_unavailable")
                assert int(answer.headers["Retry-After"]) > 0
            assert client.get("/healthz").status == 200
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    # and once it is back, so is the API
    assert client.get(f"/api/jobs/{job['id']}").status == 200


@pytest.mark.parametrize("mode", ["distributed"], indirect=True)
def test_503_while_the_broker_cannot_be_reached(serve, engine_env, monkeypatch):
    # given RabbitMQ where nothing listens
    point_engine_at({**engine_env, "ENGINE_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/%2F"}, monkeypatch)
    client = serve()
    for answer in (client.get("/api/queues"), client.get("/readyz"), client.post("/api/jobs", {"actor": "echo", "args": [1]})):
        _error(answer, 503, "broker_unavailable")
        assert int(answer.headers["Retry-After"]) > 0
    # nothing was enqueued, and the store's side still answers
    assert client.get("/api/jobs").json["jobs"] == []
    assert client.get("/api/overview").json["queues"] is None
